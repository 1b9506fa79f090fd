"""Installers for tillsync: ``python -m installer.linux`` (systemd); the Windows MSI in windows/."""
