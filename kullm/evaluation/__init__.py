"""The evaluation stage: G-Eval prompts and parsing, LLM judges, judging runs and their report."""
