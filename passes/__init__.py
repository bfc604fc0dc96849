"""The rewrite passes, one module (or package) each, over the contract in ``passes.base``. Importing this package
imports no pass; ``passes.catalog`` imports (and so registers) the built-in ones."""
