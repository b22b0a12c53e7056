"""The node agent: the asyncio shell around the pure core (membership, controller decisions)."""
