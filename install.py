"""Run by the webui at start-up (as a subprocess, with the webui root on PYTHONPATH).

Installs only what is missing and never upgrades or downgrades a package the webui already has:
everything Pivotal needs on the webui path is already part of every supported webui, so on a
normal install this does nothing.
"""

import launch  # the webui's own helpers: is_installed() and run_pip()

# distribution name -> requirement used only when the distribution is absent
REQUIRED = {
    "safetensors": "safetensors>=0.4.2",
    "numpy": "numpy",
    "Pillow": "pillow",
}

for dist, requirement in REQUIRED.items():
    if not launch.is_installed(dist):
        launch.run_pip(f"install {requirement}", f"{requirement} for sd-webui-pivotal")
