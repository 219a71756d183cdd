"""The translation stage: English instruction and chat sets into Korean (``kullm-translate``).

``backends.py`` (DeepL and OpenAI-compatible translators over the judge's HTTP client) and ``cache.py`` (the
translation cache: nothing is paid for twice).
"""
