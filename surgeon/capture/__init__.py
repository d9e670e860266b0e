"""Capture: a model opened (folder, Hub id, factory, demo), exported with torch.export, its adaptable sites
and their roles found, and what was found kept on disk for the next process.

``models`` opens a model, ``export`` captures it, ``sites`` finds the sites, ``roles`` says what each does,
``cache`` keeps a capture. This floor imports only the floors below it: methods, kernels, grammar, errors.
"""
