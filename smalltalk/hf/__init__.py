"""Our LM for Hugging Face transformers, as `smalltalk export` ships it beside each model.

`configuration_smalltalk.py` and `modeling_smalltalk.py` are copied into every exported
`experts/e{e}/` (and `dense/`) folder and named in its `config.json` (`auto_map`), so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it. They need
torch and transformers only, never this package; `smalltalk.load` never imports them.
"""
