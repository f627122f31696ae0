# syntax_stray_character.kt: a semicolon is not part of the language
# expect: E101
graph syntax_stray_character
data digits { val_split = 300 }
node a : cnn_tiny [target];
label -> a : through
