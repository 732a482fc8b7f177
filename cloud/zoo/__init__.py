"""`python -m cloud.zoo train|eval`: build the project's teacher/student zoo and measure it."""
