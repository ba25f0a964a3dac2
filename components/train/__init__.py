"""Step 4: DeepSpeed stage training of Unified Next-DiT (one stage per run)."""
