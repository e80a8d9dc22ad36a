"""``lit-llm serve``: an OpenAI-compatible server with a browser chat page (see ``docs/serve.md``).

- :mod:`lit_llm.serve.engine`: the scheduler that decodes requests together (continuous batching).
- :mod:`lit_llm.serve.app`: the HTTP API (FastAPI) and the chat page (``static/``).
- :mod:`lit_llm.serve.chat`: chat messages -> prompt text.
- :mod:`lit_llm.serve.__main__`: the command.

The server's dependencies are an extra: ``pip install 'lit_llm[serve]'``.
"""
