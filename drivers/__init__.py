"""Device drivers: printers, cash drawers, scanners and scales, with emulators."""
