"""FLUX.1's pure maths: latent packing and ids, the flow-matching schedule and loss inputs, the Euler sampler, Kontext tokens."""
