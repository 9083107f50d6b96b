"""LingBot-World Fast serving core. Importing it applies LINGBOT_COMPILE_CACHE (worker/compile_cache.py) before
any of its modules imports torch."""

from worker.compile_cache import configure as _configure_compile_cache

_configure_compile_cache()
