//! Parser for Python call syntax and literals (ToolACE answers, BFCL outputs).
