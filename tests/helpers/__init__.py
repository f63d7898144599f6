"""Test helpers shared by unit, integration and slow tests."""
