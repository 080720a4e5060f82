"""The commands of `rlaif-ray` (cli.py), one module each, and the training pipeline they drive."""
