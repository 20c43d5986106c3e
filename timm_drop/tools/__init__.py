"""Tools built on the public API and kept out of the core package: ``coverage`` checks the rewriter's
guarantees over timm's model registry (``timm-drop coverage``)."""
