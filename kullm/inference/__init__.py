"""The inference stage: generation (prompts, files, chat) and merging an adapter into its base."""
