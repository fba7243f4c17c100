"""One agent's turn: the prompt, the model's reply, its tool calls, and what the turn writes."""
