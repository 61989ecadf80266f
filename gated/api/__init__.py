"""Client and data model of the Coord Parking Access API."""
