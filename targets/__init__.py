"""Code generators: each target consumes a Plan and writes artifacts."""
