"""Tests never use the network: the model hubs are put in offline mode before anything imports
them, so a test that would download weights fails at once with a clear error instead of retrying."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
