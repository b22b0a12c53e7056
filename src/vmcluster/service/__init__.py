"""Admin operations over explicit dependencies (a node's
:class:`~vmcluster.service.context.NodeContext`); the REST API only translates them to HTTP."""
