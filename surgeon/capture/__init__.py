"""Capture: a model opened (folder, Hub id, factory, demo), exported with torch.export, its adaptable sites
and their roles found, and what was found kept on disk for the next process.

``captured.capture(opened) -> Captured`` is the entry point; it uses the others:

- ``models`` opens a model (``model_folders`` checks a folder, ``demos`` builds the built-in ones);
- ``export`` captures it with ``torch.export`` (``quantized_bases``: bitsandbytes layers, seen as surgeon ops);
- ``sites`` reads the adaptable sites off the graph, and what the language can ask of each module;
- ``roles`` says what each site does, from the dataflow;
- ``cache`` keeps sites and roles on disk, keyed by architecture.

This floor imports only the floors below it: methods, kernels, grammar, errors.
"""
