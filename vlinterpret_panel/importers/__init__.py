"""Importers: convert other tools' data (e.g. VL-InterpreT databases) into stores of our schema."""
