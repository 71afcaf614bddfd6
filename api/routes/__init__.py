"""One APIRouter per module; ``api/main.py`` includes them."""
