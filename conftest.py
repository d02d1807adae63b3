import os

# Notebooks collected by nbval cannot take papermill parameters: the environment variable selects
# their quick smoke versions (kernels inherit this process's environment).
os.environ.setdefault("ESNB_SMOKE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
