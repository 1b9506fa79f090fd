"""The Windows installer: a WiX source built into tillsync-<version>.msi by wixl (msitools)."""
