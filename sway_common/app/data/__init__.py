"""Text bundled with the package: the demo document and prompts about it."""
