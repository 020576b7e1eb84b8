"""Glue between Pivotal and a running A1111-style webui (callbacks, HTTP API, queue runner).

Every module here imports the webui's ``modules`` lazily, inside functions, so the package
imports (and its pure parts are testable) outside the webui.
"""
