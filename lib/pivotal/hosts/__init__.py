"""Host adapters: one module per host (standalone diffusers, A1111, later Forge).

Only modules in this package may import a webui's ``modules``; the core never imports a host.
"""
