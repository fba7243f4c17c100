"""What a session leaves for people and tools: the HTML report and the JSON and Markdown exports."""
