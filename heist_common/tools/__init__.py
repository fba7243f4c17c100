"""The tool catalogue as models and MCP clients see it: schemas and live argument constraints, from the protos."""
