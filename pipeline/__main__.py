from .cli import main

if __name__ == "__main__":   # spawned decoding processes import this module too
    main()
