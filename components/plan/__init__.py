"""Plan step: list the source cheaply and split it into groups for the fanned-out data steps."""
