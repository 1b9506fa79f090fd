"""ESC/POS receipt printers and cash drawers: command bytes, status parsing, receipts, driver."""
