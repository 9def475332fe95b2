"""Developer tools: the embedded demo's tiny models, and the benchmark."""
