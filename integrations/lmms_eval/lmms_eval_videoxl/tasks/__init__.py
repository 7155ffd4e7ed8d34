"""Task code for the offline tasks: `videoxl_needle` (generation), `videoxl_needle_choice` (option
likelihoods) and the Video-MME stand-in's YAML (whose functions are lmms-eval's own `videomme` ones).
`scripts/write_eval_data.py` writes each data set next to a copy of its YAML."""
