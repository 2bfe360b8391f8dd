"""The CPU demo: TiM vs flow matching on scikit-learn digits (or a 2-D toy), trained and scored in minutes."""
