"""The file formats, on plain data (plans, state dicts, configs, exported programs; never a compiled model):
PEFT adapter folders both ways (peft*.py), merged Hugging Face checkpoints (merged.py), ``.pt2`` programs
(program*.py) and hot swaps into them (hot_swap.py), output folders (output_folder.py); all written atomically."""
