"""The `lookout` command: the user's calls to the API, the embedded stack, `up` and the demo."""
