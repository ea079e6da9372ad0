"""A fake Hugging Face Hub for the tests: an in-memory HTTP server that the real, unmodified
huggingface_hub client talks to (``server.LocalHub``), the pytest fixtures that run it for one test
(``fixtures``; tests/conftest.py makes them available everywhere), and the tests of the fake itself
(``test_fake_hub.py``). Nothing in the package under test imports from here."""
