"""Database: ORM models, engine/session, migrations."""
