"""Configs as code: every file has ``get_config(arg)`` and can be imported (``from configs import
finetune``) or passed to ``main.py --config=configs/<file>.py[:arg]``."""
