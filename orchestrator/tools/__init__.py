"""The tools as the contracts describe them: function schemas and argument grammars derived from the protos."""
