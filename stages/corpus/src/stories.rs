//! A seeded generator of simple children's stories, so the default pipeline runs offline.
//!
//! This text is SYNTHETIC: grammar-template stories with a few hundred words of vocabulary and a
//! handful of plot shapes. It is good for exercising the pipeline and for smoke-testing models;
//! it is not TinyStories and numbers measured on it say little about real language.

use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const GIRLS: &[&str] = &[
    "Lily", "Mia", "Sara", "Emma", "Zoe", "Anna", "Ruby", "Maya", "Nora", "Ella", "Lucy", "Ivy", "Chloe", "Hana",
    "Rosa",
];
const BOYS: &[&str] =
    &["Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Finn", "Omar", "Theo", "Noah", "Eli", "Kai", "Luca", "Ravi", "Ned"];
const ANIMALS: &[(&str, &str)] = &[
    ("cat", "soft"),
    ("dog", "happy"),
    ("rabbit", "quick"),
    ("bird", "little"),
    ("fox", "clever"),
    ("bear", "big"),
    ("duck", "yellow"),
    ("frog", "green"),
    ("mouse", "tiny"),
    ("owl", "wise"),
    ("turtle", "slow"),
    ("lamb", "gentle"),
    ("squirrel", "busy"),
    ("puppy", "playful"),
    ("kitten", "curious"),
    ("pony", "brave"),
    ("hedgehog", "shy"),
    ("goat", "silly"),
];
const PLACES: &[&str] = &[
    "a small house by the river",
    "a big farm",
    "a quiet village",
    "a sunny park",
    "a green forest",
    "a tall tower",
    "a busy town",
    "a little boat",
    "a garden full of flowers",
    "a snowy hill",
    "a cozy cabin",
    "a sandy beach",
];
const OBJECTS: &[(&str, &str)] = &[
    ("ball", "red"),
    ("kite", "blue"),
    ("hat", "funny"),
    ("box", "shiny"),
    ("book", "old"),
    ("cake", "sweet"),
    ("boat", "wooden"),
    ("flower", "pink"),
    ("drum", "loud"),
    ("key", "golden"),
    ("blanket", "warm"),
    ("shell", "pretty"),
    ("lamp", "bright"),
    ("bucket", "little"),
    ("scarf", "long"),
    ("toy train", "fast"),
    ("jar of honey", "sticky"),
    ("map", "secret"),
];
const FEELINGS: &[&str] =
    &["happy", "sad", "scared", "excited", "tired", "proud", "worried", "surprised", "angry", "calm"];
const WEATHER: &[&str] = &[
    "the sun was warm",
    "it was raining",
    "the wind was strong",
    "snow was falling",
    "the sky was gray",
    "the stars were out",
];
const FRIENDS_SAY: &[&str] = &[
    "Do not worry, I will help you!",
    "We can do it together.",
    "Let us try one more time.",
    "I have an idea!",
    "You are not alone.",
    "Be brave, my friend.",
    "Maybe we should ask for help.",
];
const MORALS: &[&str] = &[
    "Sharing makes everyone happy.",
    "It is good to help a friend.",
    "Being brave is not the same as not being scared.",
    "Saying sorry can fix a lot.",
    "Patience makes hard things easy.",
    "Friends are the best treasure.",
    "It is okay to ask for help.",
];

struct Hero {
    name: String,
    he: &'static str,
    his: &'static str,
    him: &'static str,
}

fn pick<'a, T>(r: &mut ChaCha8Rng, xs: &'a [T]) -> &'a T {
    xs.choose(r).unwrap_or(&xs[0])
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn hero(r: &mut ChaCha8Rng) -> Hero {
    match r.random_range(0..3) {
        0 => Hero { name: pick(r, GIRLS).to_string(), he: "she", his: "her", him: "her" },
        1 => Hero { name: pick(r, BOYS).to_string(), he: "he", his: "his", him: "him" },
        _ => {
            let (a, adj) = *pick(r, ANIMALS);
            Hero { name: format!("a {adj} {a}"), he: "it", his: "its", him: "it" }
        }
    }
}

/// One story; different seeds give different characters, objects, problems and endings.
pub fn story(r: &mut ChaCha8Rng) -> String {
    let h = hero(r);
    let name = h.name.clone();
    let the_name = name.strip_prefix("a ").map_or_else(|| name.clone(), |n| format!("the {n}"));
    let friend = if r.random_bool(0.5) {
        let (a, adj) = *pick(r, ANIMALS);
        format!("a {adj} {a}")
    } else {
        let names = if r.random_bool(0.5) { GIRLS } else { BOYS };
        pick(r, names).to_string()
    };
    let the_friend = friend.strip_prefix("a ").map_or_else(|| friend.clone(), |f| format!("the {f}"));
    let (obj, obj_adj) = *pick(r, OBJECTS);
    let place = pick(r, PLACES);
    let mut s = Vec::new();
    s.push(match r.random_range(0..4) {
        0 => format!("Once upon a time, there was {name} who lived in {place}."),
        1 => format!("One day, {name} woke up in {place} and {}.", pick(r, WEATHER)),
        2 => format!("{} lived in {place}. Every morning, {} liked to play outside.", cap(&name), h.he),
        _ => format!("There was once {name}. {} had a {obj_adj} {obj} that {} loved very much.", cap(h.he), h.he),
    });
    let plot = r.random_range(0..5);
    match plot {
        0 => {
            s.push(format!("One morning, {} could not find {} {obj_adj} {obj}.", the_name, h.his));
            s.push(format!(
                "{} looked under the bed and behind the door, but it was not there. {} felt {}.",
                cap(h.he),
                cap(h.he),
                pick(r, &["sad", "worried", "scared"])
            ));
            s.push(format!("Then {friend} came by. \"What is wrong?\" asked {the_friend}."));
            s.push(format!("\"I lost my {obj},\" said {the_name}. \"{}\" said {the_friend}.", pick(r, FRIENDS_SAY)));
            let spot = pick(
                r,
                &["in the tall grass", "near the old tree", "under a big leaf", "by the pond", "inside a little hole"],
            );
            s.push(format!("They looked everywhere together. At last, they found the {obj} {spot}."));
            s.push(format!(
                "{} was so {} that {} gave {the_friend} a big hug.",
                cap(&the_name),
                pick(r, &["happy", "glad", "thankful"]),
                h.he
            ));
        }
        1 => {
            let fear =
                pick(r, &["the dark", "the loud thunder", "the deep water", "the big dog next door", "the tall slide"]);
            s.push(format!("But {} was afraid of {fear}.", the_name));
            s.push(format!(
                "When {} came, {} hid and did not want to come out.",
                if fear.contains("thunder") { "the storm" } else { "night" },
                h.he
            ));
            s.push(format!(
                "{} sat next to {}. \"{}\" said {the_friend} softly.",
                cap(&friend),
                h.him,
                pick(r, FRIENDS_SAY)
            ));
            s.push(format!(
                "{} took a deep breath. Slowly, {} was not so {} anymore.",
                cap(&the_name),
                h.he,
                pick(r, &["scared", "worried"])
            ));
            s.push(format!("The next day, {} told everyone, \"I was brave!\"", the_name));
        }
        2 => {
            let treat = pick(r, &["cookies", "apples", "berries", "sandwiches", "cupcakes"]);
            s.push(format!("{} had a basket of {treat}. {} wanted to eat them all.", cap(&the_name), cap(h.he)));
            s.push(format!(
                "Then {} saw {friend}, who looked {}.",
                h.he,
                pick(r, &["hungry", "sad", "lonely", "tired"])
            ));
            s.push(format!("{} thought for a moment. Then {} said, \"Would you like some {treat}?\"", cap(h.he), h.he));
            s.push(format!(
                "{} smiled. They sat {} and ate the {treat} together.",
                cap(&the_friend),
                pick(r, &["on the grass", "by the window", "under a tree", "near the fire"])
            ));
            s.push(format!(
                "{} learned that sharing made {} feel {}.",
                cap(&the_name),
                h.him,
                pick(r, &["warm inside", "very happy", "proud"])
            ));
        }
        3 => {
            let goal = pick(
                r,
                &[
                    "climb the big hill",
                    "fly a kite",
                    "build a sand castle",
                    "bake a cake",
                    "cross the little river",
                    "reach the top shelf",
                ],
            );
            s.push(format!("{} wanted to {goal}, but it was hard.", cap(&the_name)));
            s.push(format!(
                "The first time, {} fell down. The second time, {} {} the {obj}.",
                h.he,
                h.he,
                pick(r, &["dropped", "lost", "broke"])
            ));
            s.push(format!("\"{}\" said {friend}.", pick(r, FRIENDS_SAY)));
            s.push("So they tried again, slowly and carefully, and this time it worked!".to_string());
            s.push(format!(
                "{} felt very {}. {} could {goal} after all.",
                cap(&the_name),
                pick(r, &["proud", "happy", "excited"]),
                cap(h.he)
            ));
        }
        _ => {
            s.push(format!("One day, {} and {friend} had a fight about the {obj_adj} {obj}.", the_name));
            s.push(format!("\"It is mine!\" said {}. \"No, it is mine!\" said {the_friend}.", the_name));
            s.push(format!(
                "They pulled and pulled, and the {obj} {}.",
                pick(r, &["broke in two", "fell in the mud", "rolled away"])
            ));
            s.push(format!("Both of them felt {}. Then {} said, \"I am sorry.\"", pick(r, FEELINGS), the_name));
            s.push(format!("\"I am sorry too,\" said {the_friend}. They fixed the {obj} and played with it together."));
        }
    }
    s.push(match r.random_range(0..3) {
        0 => format!("From that day on, they were best friends. {}", pick(r, MORALS)),
        1 => format!("That night, {} went to sleep with a big smile.", the_name),
        _ => format!("The end. {}", pick(r, MORALS)),
    });
    // Paragraph breaks, as in TinyStories.
    let mut out = String::new();
    for (i, sentence) in s.iter().enumerate() {
        if i > 0 {
            out.push(if i % 3 == 0 { '\n' } else { ' ' });
        }
        out.push_str(sentence);
    }
    out
}
