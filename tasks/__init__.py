"""The work the application's modules do when their events arrive."""
