"""The cluster database: a store interface, its etcd implementation and an in-memory fake."""
