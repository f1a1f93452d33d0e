"""Agent definitions: the demo chain. Point --app at your own module for yours."""
