"""Weights by name: sources (``hf:``, ``openai:``, URLs, files) fetched into local caches (:mod:`.sources`), checksummed
resumable downloads (:mod:`.download`) and the catalogue of the configs' default sources (:mod:`.catalog`). Nothing
here converts or imports torch; the converted-weights cache is :mod:`port_weights.cache`."""
