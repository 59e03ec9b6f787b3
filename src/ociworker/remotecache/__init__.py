"""Build cache export (``--cache-to``) and import (``--cache-from``): see docs/cache.md."""
