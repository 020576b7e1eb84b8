"""The web UI (gradio 3.41 and 4-6): the Train and Generate tabs and the standalone app.

Nothing is imported here: ``import pivotal.ui`` does not import gradio. The webui embeds
:func:`pivotal.ui.train_tab.build_train_tab`; ``pivotal app`` runs :mod:`pivotal.ui.app`.
"""
