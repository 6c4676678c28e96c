"""The built-in prompt set of `cltrace validate`: 60 short prompts of the kinds the paper's case studies use.

Short prompts (4–16 tokens) keep one attribution graph per prompt cheap on a CPU. They mix factual recall,
multi-hop facts, antonyms, arithmetic, sequences, code, grammar (agreement, pronouns), acronyms, rhymes,
translation and other languages, so that means over the set are not the habits of one task. Kept as a Python
module (not a text file) so that every install of the package carries it.
"""

PROMPTS: tuple[str, ...] = (
    # factual recall
    "Fact: Michael Jordan plays the sport of",
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "The chemical symbol for gold is",
    "Water is made of hydrogen and",
    "The largest planet in the solar system is",
    "Shakespeare wrote the play Romeo and",
    "The currency of Japan is the",
    "The first president of the United States was George",
    "Mount Everest is the highest mountain in the",
    # multi-hop
    "Fact: the capital of the state containing Dallas is",
    "The language spoken in the country whose capital is Madrid is",
    "The author of Harry Potter was born in the country of",
    # antonyms and categories
    "The opposite of hot is",
    "The opposite of small is",
    "The opposite of \"up\" is \"",
    "A dog is a kind of",
    "Red, green and blue are all",
    "Apples, bananas and cherries are all types of",
    # arithmetic and sequences
    "1, 2, 3, 4,",
    "2, 4, 6, 8,",
    "calc: 36+59=",
    "Three plus four equals",
    "Monday, Tuesday, Wednesday,",
    "January, February, March,",
    "A, B, C, D,",
    "10, 20, 30, 40,",
    # code
    "def add(a, b):\n    return a",
    "for i in range(10):\n    print(",
    "import numpy as",
    "<html><head><title>",
    "SELECT name FROM users WHERE",
    # grammar: agreement, pronouns, syntax
    "The keys to the cabinet",
    "The girl lost her keys, so",
    "When Mary and John went to the store, John gave a drink to",
    "The cats that the dog chased",
    "She walked into the room and sat down on the",
    "If it rains tomorrow, we will",
    # acronyms and spelling
    "The National Digital Analytics Group (N",
    "The World Health Organization (W",
    "The letters of the word cat are c, a,",
    # rhymes and poetry
    "He saw a carrot and had to grab it,\nHis hunger was like a starving",
    "Twinkle, twinkle, little star, how I wonder what you",
    "Roses are red, violets are",
    # translation and other languages
    "The French word for cat is",
    "English: dog. Spanish:",
    "Le chat est sur la",
    "Der Hund ist",
    "La capital de Italia es",
    # idioms and common phrases
    "Better late than",
    "Actions speak louder than",
    "Once upon a",
    "The early bird catches the",
    # reasoning and world knowledge
    "If you drop a glass on the floor, it will",
    "Ice melts when it gets",
    "People use umbrellas when it is",
    "The sun rises in the",
    # dates, units, misc
    "There are seven days in a",
    "One kilometer is one thousand",
    "Christmas is celebrated in the month of",
)
