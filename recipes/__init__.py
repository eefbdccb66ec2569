"""The shipped recipes (YAML); `marval-rl recipes` lists them, `marval-rl train NAME` runs one."""
